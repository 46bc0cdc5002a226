-- Bookings stop serialising each other's commits.
--
-- book_appointment inserts the booking's notification, and the outbox trigger NOTIFYs the
-- workers. PostgreSQL serialises the commits of all transactions that NOTIFY, each holding a
-- lock across its WAL flush (migration 0005): bookings could commit no faster than one flush
-- after another, about 1,100/s on the benchmark machine with both cores a fifth idle (pgbench
-- with the booking's three inserts: 1,694 transactions/s with the NOTIFY, 2,687 without;
-- bench/README.md, "Booking"). Like the payment callbacks, a booking now wakes the workers
-- after its commit (api/booking/booking.py, `book`, through notifications/outbox.py's Waker).
ALTER FUNCTION book_appointment(
    uuid, bigint, uuid, text, text, bytea, jsonb, uuid, uuid, uuid, uuid, uuid, uuid, timestamptz, timestamptz,
    text, integer, boolean, timestamptz, uuid, text, bigint, integer, uuid[], text[], text[], text[], timestamptz[])
    SET telehealth.wake_after_commit = 'on';
