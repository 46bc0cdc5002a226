"""Payments: invoices, attempts, provider callbacks, the ledger."""
