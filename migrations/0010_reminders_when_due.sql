-- A visit's reminders are written when they fall due, not when it is booked.
--
-- Until now a booking inserted its two reminders (a day and 15 minutes before) as outbox rows
-- with a future `not_before`, and cancelling, moving or checking in withdrew and rewrote them.
-- Each row costs the booking a heap tuple, five index entries and a foreign key check: about a
-- twentieth of the PostgreSQL work of a booking (bench/README.md, "Booking"). Now a booked
-- appointment carries only the time of its next reminder, kept by a trigger whenever its status
-- or start changes, and the housekeeping job (api/booking/reminders.py) turns due ones into
-- outbox rows. A reminder whose time had already passed when the visit was booked or moved is
-- never sent ("tomorrow" is wrong for a visit booked two hours ahead), as before.
--
-- Appointments booked before this migration keep the reminder rows they have; their
-- `next_reminder_at` stays NULL until they are moved, so nothing is sent twice.

-- The reminders of a visit starting at p_starts_at: the one rule, used by the trigger and the sweep.
CREATE FUNCTION appointment_reminders(p_starts_at timestamptz) RETURNS TABLE (kind text, at timestamptz)
    LANGUAGE sql STABLE AS $$
    VALUES ('appointment_reminder_24h', p_starts_at - interval '24 hours'),
           ('appointment_reminder_15m', p_starts_at - interval '15 minutes')
$$;

ALTER TABLE appointments ADD COLUMN next_reminder_at timestamptz;
CREATE INDEX appointments_reminders_due ON appointments (next_reminder_at) WHERE next_reminder_at IS NOT NULL;

-- Booked: the first reminder still ahead; anything else (held, cancelled, checked in...): none.
CREATE FUNCTION appointment_plan_reminders() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'booked' THEN
        NEW.next_reminder_at := (SELECT min(r.at) FROM appointment_reminders(NEW.starts_at) r WHERE r.at > now());
    ELSE
        NEW.next_reminder_at := NULL;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER appointments_plan_reminders BEFORE INSERT OR UPDATE OF status, starts_at ON appointments
    FOR EACH ROW EXECUTE FUNCTION appointment_plan_reminders();
