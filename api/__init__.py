"""Telehealth HTTP API and its domains."""
