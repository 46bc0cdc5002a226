-- Payment callbacks at volume.
--
-- A payment report finds the appointment its invoice pays for (to lock it, book it and tell
-- whoever booked it). Without an index that was a scan of every appointment ever made, once
-- or more per callback.
CREATE INDEX appointments_invoice ON appointments (invoice_id) WHERE invoice_id IS NOT NULL;

-- PostgreSQL serialises the commits of all transactions that NOTIFY: each holds a lock from
-- just before its commit until after the commit's WAL flush, so enqueuing transactions could
-- commit no faster than one flush after another (about 1,000/s here, whatever the load). A
-- transaction may instead promise to wake the workers itself once it has committed
-- (notifications/outbox.py, `Waker`), by setting telehealth.wake_after_commit; then it does not
-- NOTIFY. Every other enqueue still wakes them at its commit, as before.
CREATE OR REPLACE FUNCTION wake_notification_workers() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('telehealth.wake_after_commit', true) IS DISTINCT FROM 'on' THEN
        PERFORM pg_notify('notification_outbox', '');
    END IF;
    RETURN NULL;
END
$$;
