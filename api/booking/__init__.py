"""Booking: schedules, computed availability, appointments, holds, queue numbers, check-in, the waitlist."""
