"""The facility directory: facilities, their services and doctors, and facility administration."""
