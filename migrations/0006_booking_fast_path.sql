-- Booking in one round trip, and versions that tell a cached availability answer it is stale.
--
-- slot_versions: one counter per doctor and clinic day, bumped by triggers in the transaction of
-- any change that can move that day's free slots (an appointment taking, leaving or moving out of
-- a place, a hold's expiry time changing), and one per doctor on day '-infinity' for changes to
-- the doctor's schedules themselves (schedules, their exceptions, the doctor or service switched
-- off or changed). Rows are never deleted and counters only grow, so the sum over a doctor's (or a
-- facility's) rows in a date range changes whenever anything in it changed: api/booking/versions.py
-- reads that sum to decide whether a cached answer still holds.
--
-- The booking rules (api/booking/booking.py) move into functions, so that a booking is one
-- statement: booking_patient_refusal, booking_take_place, booking_expire_holds, and
-- book_appointment for the whole POST /v1/appointments.

CREATE FUNCTION clinic_day(timestamptz) RETURNS date
    LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
    AS $$ SELECT ($1 AT TIME ZONE 'Asia/Ho_Chi_Minh')::date $$;

CREATE TABLE slot_versions (
    doctor_id uuid NOT NULL,
    -- A clinic day; '-infinity' for the doctor's schedules.
    day date NOT NULL,
    -- No foreign keys: a deleted doctor's rows stay, so a facility's sum never goes down.
    facility_id uuid NOT NULL,
    version bigint NOT NULL,
    PRIMARY KEY (doctor_id, day)
);
CREATE INDEX slot_versions_facility ON slot_versions (facility_id, day);

-- Everything below is PL/pgSQL, not SQL functions: PL/pgSQL keeps its statements' plans for the
-- session, while a SQL function that cannot be inlined plans its body again in every transaction.
CREATE FUNCTION bump_slot_version(p_doctor uuid, p_facility uuid, p_day date) RETURNS void
    LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO slot_versions (doctor_id, day, facility_id, version) VALUES (p_doctor, p_day, p_facility, 1)
    ON CONFLICT (doctor_id, day) DO UPDATE SET version = slot_versions.version + 1;
END
$$;

-- Appointments: a place is held by the statuses of the exclusion constraint; a hold's expiry
-- time decides when it stops counting. (Every booking runs this: the upsert is written out.)
CREATE FUNCTION appointments_bump_slot_versions() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    old_day date;
    new_day date;
BEGIN
    IF TG_OP <> 'INSERT' AND OLD.status IN ('held', 'booked', 'checked_in', 'completed') THEN
        old_day := clinic_day(OLD.starts_at);
        INSERT INTO slot_versions (doctor_id, day, facility_id, version)
        VALUES (OLD.doctor_id, old_day, OLD.facility_id, 1)
        ON CONFLICT (doctor_id, day) DO UPDATE SET version = slot_versions.version + 1;
    END IF;
    IF TG_OP <> 'DELETE' AND NEW.status IN ('held', 'booked', 'checked_in', 'completed') THEN
        new_day := clinic_day(NEW.starts_at);
        IF old_day IS NULL OR new_day <> old_day OR NEW.doctor_id <> OLD.doctor_id THEN
            INSERT INTO slot_versions (doctor_id, day, facility_id, version)
            VALUES (NEW.doctor_id, new_day, NEW.facility_id, 1)
            ON CONFLICT (doctor_id, day) DO UPDATE SET version = slot_versions.version + 1;
        END IF;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER appointments_slot_versions AFTER INSERT OR DELETE ON appointments
    FOR EACH ROW EXECUTE FUNCTION appointments_bump_slot_versions();
CREATE TRIGGER appointments_slot_versions_update
    AFTER UPDATE OF status, starts_at, ends_at, doctor_id, hold_expires_at ON appointments
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.starts_at IS DISTINCT FROM NEW.starts_at
          OR OLD.ends_at IS DISTINCT FROM NEW.ends_at OR OLD.doctor_id IS DISTINCT FROM NEW.doctor_id
          OR OLD.hold_expires_at IS DISTINCT FROM NEW.hold_expires_at)
    EXECUTE FUNCTION appointments_bump_slot_versions();

CREATE FUNCTION schedules_bump_slot_versions() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        PERFORM bump_slot_version(OLD.doctor_id, OLD.facility_id, '-infinity');
    END IF;
    IF TG_OP <> 'DELETE' AND (TG_OP = 'INSERT' OR NEW.doctor_id <> OLD.doctor_id) THEN
        PERFORM bump_slot_version(NEW.doctor_id, NEW.facility_id, '-infinity');
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER schedules_slot_versions AFTER INSERT OR UPDATE OR DELETE ON schedules
    FOR EACH ROW EXECUTE FUNCTION schedules_bump_slot_versions();

-- An exception whose schedule is being deleted finds no schedule: that delete bumps already.
CREATE FUNCTION schedule_exceptions_bump_slot_versions() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM bump_slot_version(s.doctor_id, s.facility_id, '-infinity')
       FROM schedules s
      WHERE s.id IN (CASE WHEN TG_OP <> 'DELETE' THEN NEW.schedule_id END,
                     CASE WHEN TG_OP <> 'INSERT' THEN OLD.schedule_id END);
    RETURN NULL;
END
$$;
CREATE TRIGGER schedule_exceptions_slot_versions AFTER INSERT OR UPDATE OR DELETE ON schedule_exceptions
    FOR EACH ROW EXECUTE FUNCTION schedule_exceptions_bump_slot_versions();

CREATE FUNCTION doctors_bump_slot_versions() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM bump_slot_version(OLD.id, OLD.facility_id, '-infinity');
    RETURN NULL;
END
$$;
CREATE TRIGGER doctors_slot_versions AFTER UPDATE OF active OR DELETE ON doctors
    FOR EACH ROW EXECUTE FUNCTION doctors_bump_slot_versions();

-- A service's length, switch and prepayment shape its doctors' slots and bookings.
CREATE FUNCTION services_bump_slot_versions() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM bump_slot_version(s.doctor_id, s.facility_id, '-infinity')
       FROM (SELECT DISTINCT doctor_id, facility_id FROM schedules WHERE service_id = NEW.id) s;
    RETURN NULL;
END
$$;
CREATE TRIGGER services_slot_versions
    AFTER UPDATE OF active, duration_minutes, prepayment_required ON services
    FOR EACH ROW EXECUTE FUNCTION services_bump_slot_versions();

-- ------------------------------------------------------------------ the booking rules
--
-- Locks, always in this order: the Idempotency-Key (a new booking) or the appointment's row (a
-- move), the patient, the doctor's clinic day(s) in date order. The first three kinds are
-- advisory, transaction-scoped, and keyed by text:
--   'patient:<uuid>'                 one patient's bookings, moves and offers, one at a time, so
--                                    their limits are counted without a race (not a lock on the
--                                    users row: every insert referencing the user would wait);
--   'slots:<doctor uuid>:<YYYY-MM-DD>' changes to one doctor's places on one clinic day
--                                    (queries.lock_doctor_days says why; booking_lock_day).
--
-- Plans: the functions a booking enters set plan_cache_mode = force_generic_plan. Their range
-- conditions make PostgreSQL's generic plans look costlier than custom ones, so without it every
-- statement was planned again on every call (40-60 µs each). And enable_seqscan = off: a plan is
-- kept for the session, and one made while `appointments` was small (a fresh database, before
-- autovacuum's next ANALYZE) scanned the whole table in every booking as it grew (2.7 ms of
-- PostgreSQL CPU per booking in bench/booking.py instead of about 1). Every statement here has
-- an index that fits.
--
-- Overlaps are found through the btree indexes, bounded below by a day: no appointment is longer
-- than its service, at most 480 minutes (services.duration_minutes). The exclusion constraints'
-- GiST indexes, on a random uuid and a range, prune poorly (26 pages and 0.6 ms for a patient's
-- overlap check on the benchmark's database, against 4 µs this way).

CREATE FUNCTION booking_lock_day(p_doctor uuid, p_day date) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('slots:' || p_doctor::text || ':' || to_char(p_day, 'YYYY-MM-DD'), 0));
END
$$;

-- Holds past their time become `expired`, their pending invoices `void`, the waitlist offers they
-- were `lapsed`; the expired rows. With a doctor (or patient) and a time: the stale holds in the
-- way of that booking. SKIP LOCKED: a hold being paid right now is left to its payer.
CREATE FUNCTION booking_expire_holds(
    p_doctor uuid, p_patient uuid, p_start timestamptz, p_end timestamptz, p_limit integer
) RETURNS SETOF appointments LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $$
BEGIN
    RETURN QUERY
    WITH stale AS (
        SELECT id FROM appointments
         WHERE status = 'held' AND hold_expires_at <= now()
           AND (p_doctor IS NULL OR doctor_id = p_doctor OR patient_id = p_patient)
           AND (p_start IS NULL OR tstzrange(starts_at, ends_at) && tstzrange(p_start, p_end))
         ORDER BY hold_expires_at LIMIT p_limit
         FOR UPDATE SKIP LOCKED),
    expired AS (
        UPDATE appointments a SET status = 'expired', updated_at = now()
          FROM stale WHERE a.id = stale.id
        RETURNING a.*),
    voided AS (
        UPDATE invoices SET status = 'void', updated_at = now()
         WHERE id IN (SELECT invoice_id FROM expired) AND status = 'pending'),
    lapsed AS (
        UPDATE waitlist_entries SET status = 'lapsed', updated_at = now()
         WHERE status = 'offered' AND offer_appointment_id IN (SELECT id FROM expired))
    SELECT * FROM expired;
END
$$;

-- One patient, one place at a time, and at most `p_max` upcoming visits per facility: NULL, or
-- the refusal's code. Locks the patient's bookings first, so two of them cannot both pass.
CREATE FUNCTION booking_patient_refusal(
    p_patient uuid, p_facility uuid, p_start timestamptz, p_end timestamptz, p_moving uuid, p_max integer
) RETURNS text LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $$
DECLARE
    v_busy boolean;
    v_upcoming bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('patient:' || p_patient::text, 0));
    SELECT EXISTS (
               SELECT 1 FROM appointments
                WHERE patient_id = p_patient AND starts_at > p_start - interval '1 day' AND starts_at < p_end
                  AND ends_at > p_start AND id IS DISTINCT FROM p_moving
                  AND status IN ('held', 'booked', 'checked_in')
                  AND (status <> 'held' OR hold_expires_at > now())),
           (SELECT count(*) FROM appointments
             WHERE patient_id = p_patient AND facility_id = p_facility AND starts_at > now()
               AND id IS DISTINCT FROM p_moving
               AND (status IN ('booked', 'checked_in') OR (status = 'held' AND hold_expires_at > now())))
      INTO v_busy, v_upcoming;
    IF v_busy THEN
        RETURN 'overlapping_appointment';
    ELSIF v_upcoming >= p_max THEN
        RETURN 'too_many_appointments';
    END IF;
    RETURN NULL;
END
$$;

-- The new appointment in the first free place of its slot, under the doctor's day lock, with the
-- day's next queue number when it is booked in person. A stale hold in the way (the doctor's in
-- the slot, or the patient's at that time) is expired first. Returns NULL, having written nothing,
-- when every place is held; raises `slot_taken` (so the caller rolls back) in the rare case it
-- finds that out only after writing.
CREATE FUNCTION booking_take_place(
    p_id uuid, p_patient uuid, p_booked_by uuid, p_facility uuid, p_doctor uuid, p_service uuid,
    p_schedule uuid, p_start timestamptz, p_end timestamptz, p_mode text, p_status text,
    p_hold_expires timestamptz, p_invoice uuid, p_reason text, p_capacity integer
) RETURNS appointments LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $$
DECLARE
    v_day date := clinic_day(p_start);
    v_taken bigint;
    v_stale boolean;
    v_number integer;
    v_row appointments;
BEGIN
    -- booking_lock_day, written out.
    PERFORM pg_advisory_xact_lock(hashtextextended('slots:' || p_doctor::text || ':' || to_char(v_day, 'YYYY-MM-DD'), 0));
    SELECT (SELECT count(*) FROM appointments
             WHERE doctor_id = p_doctor AND starts_at > p_start - interval '1 day' AND starts_at < p_end
               AND ends_at > p_start AND status IN ('held', 'booked', 'checked_in', 'completed')
               AND (status <> 'held' OR hold_expires_at > now())),
           EXISTS (SELECT 1 FROM appointments
                    WHERE status = 'held' AND hold_expires_at <= now()
                      AND (doctor_id = p_doctor OR patient_id = p_patient)
                      AND starts_at > p_start - interval '1 day' AND starts_at < p_end AND ends_at > p_start)
      INTO v_taken, v_stale;
    IF v_taken >= p_capacity THEN
        RETURN NULL;
    END IF;
    IF v_stale THEN
        PERFORM booking_expire_holds(p_doctor, p_patient, p_start, p_end, 500);
    END IF;
    IF p_status = 'booked' AND p_mode = 'in_person' THEN
        -- Locked until the transaction ends and rolled back with it: unique and gap-free.
        INSERT INTO queue_counters (doctor_id, day, last_number) VALUES (p_doctor, v_day, 1)
        ON CONFLICT (doctor_id, day) DO UPDATE SET last_number = queue_counters.last_number + 1
        RETURNING last_number INTO v_number;
    END IF;
    FOR v_seat IN 1 .. p_capacity LOOP
        -- The exclusion constraint is the arbiter: no check-then-insert race.
        INSERT INTO appointments
            (id, patient_id, booked_by, facility_id, doctor_id, service_id, schedule_id, starts_at, ends_at,
             mode, status, seat, hold_expires_at, invoice_id, reason, queue_day, queue_number)
        VALUES (coalesce(p_id, gen_random_uuid()), p_patient, p_booked_by, p_facility, p_doctor, p_service,
                p_schedule, p_start, p_end, p_mode, p_status, v_seat, p_hold_expires, p_invoice, p_reason,
                CASE WHEN v_number IS NOT NULL THEN v_day END, v_number)
        ON CONFLICT DO NOTHING
        RETURNING * INTO v_row;
        IF FOUND THEN
            RETURN v_row;
        END IF;
    END LOOP;
    RAISE EXCEPTION 'slot_taken' USING DETAIL = 'every place of the slot is held';
END
$$;

-- POST /v1/appointments in one statement: run it outside any transaction and it is one.
-- The caller (api/booking/booking.py) has found the slot in the doctor's schedules as of
-- `p_schedule_version` and prepared everything that does not need the database: ids, the
-- notifications (checked by notifications.templates, inserted as notifications.enqueue does),
-- the response to keep for the Idempotency-Key (queue_number filled in here). Outcomes:
--   booked                   the appointment exists; `number` is its queue number
--   replay                   the key was used before with this body: its status and response
--   stale                    the schedules changed since the caller read them: read them again
--   slot_taken, not_found, overlapping_appointment, too_many_appointments, idempotency_key_reused
-- Nothing is written unless the outcome is `booked`.
CREATE FUNCTION book_appointment(
    p_user uuid, p_key text, p_route text, p_hash bytea, p_response jsonb,
    p_id uuid, p_patient uuid, p_facility uuid, p_doctor uuid, p_service uuid, p_schedule uuid,
    p_start timestamptz, p_end timestamptz, p_mode text, p_capacity integer,
    p_held boolean, p_hold_expires timestamptz, p_invoice uuid, p_reason text,
    p_schedule_version bigint, p_max_per_facility integer,
    p_note_users uuid[], p_note_kinds text[], p_note_params text[], p_note_keys text[], p_note_times timestamptz[],
    OUT outcome text, OUT replay_status integer, OUT replay_body jsonb, OUT number integer
) LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $$
DECLARE
    v_taken bigint;
    v_version bigint;
    v_seen record;
    v_refusal text;
    v_row appointments;
BEGIN
    -- When a clinic's morning opens most requests are for places already gone: say so before
    -- taking any lock (the constraint still decides the close calls). A retry of a booking that
    -- took the last place is answered as before.
    SELECT (SELECT count(*) FROM appointments
             WHERE doctor_id = p_doctor AND starts_at > p_start - interval '1 day' AND starts_at < p_end
               AND ends_at > p_start AND status IN ('held', 'booked', 'checked_in', 'completed')
               AND (status <> 'held' OR hold_expires_at > now())),
           (SELECT version FROM slot_versions WHERE doctor_id = p_doctor AND day = '-infinity')
      INTO v_taken, v_version;
    IF v_taken >= p_capacity THEN
        SELECT request_hash, status_code, response INTO v_seen
          FROM idempotency_keys WHERE user_id = p_user AND key = p_key;
        IF NOT FOUND THEN
            outcome := 'slot_taken';
        ELSIF v_seen.request_hash <> p_hash THEN
            outcome := 'idempotency_key_reused';
        ELSE
            outcome := 'replay';
            replay_status := v_seen.status_code;
            replay_body := v_seen.response;
        END IF;
        RETURN;
    END IF;
    IF coalesce(v_version, 0) <> p_schedule_version THEN
        outcome := 'stale';
        RETURN;
    END IF;
    -- The key, as api/idempotency.py claims it: a retry racing the original waits, then replays.
    PERFORM pg_advisory_xact_lock(hashtextextended(p_user::text || ':' || p_key, 0));
    SELECT request_hash, status_code, response INTO v_seen
      FROM idempotency_keys WHERE user_id = p_user AND key = p_key;
    IF FOUND THEN
        IF v_seen.request_hash <> p_hash THEN
            outcome := 'idempotency_key_reused';
        ELSE
            outcome := 'replay';
            replay_status := v_seen.status_code;
            replay_body := v_seen.response;
        END IF;
        RETURN;
    END IF;
    -- Someone else's patient is indistinguishable from nobody.
    IF p_patient <> p_user THEN
        IF NOT EXISTS (SELECT 1 FROM guardianships WHERE guardian_id = p_user AND dependent_id = p_patient) THEN
            outcome := 'not_found';
            RETURN;
        END IF;
    END IF;
    v_refusal := booking_patient_refusal(p_patient, p_facility, p_start, p_end, NULL, p_max_per_facility);
    IF v_refusal IS NOT NULL THEN
        outcome := v_refusal;
        RETURN;
    END IF;
    IF p_held THEN
        -- The invoice comes first (the appointment refers to it): make sure of a place before.
        PERFORM booking_lock_day(p_doctor, clinic_day(p_start));
        IF (SELECT count(*) FROM appointments
             WHERE doctor_id = p_doctor AND starts_at > p_start - interval '1 day' AND starts_at < p_end
               AND ends_at > p_start AND status IN ('held', 'booked', 'checked_in', 'completed')
               AND (status <> 'held' OR hold_expires_at > now())) >= p_capacity THEN
            outcome := 'slot_taken';
            RETURN;
        END IF;
        -- At the service's current price, never a price from the client.
        INSERT INTO invoices (id, patient_id, facility_id, service_id, amount_vnd)
        SELECT p_invoice, p_patient, p_facility, id, price_vnd FROM services WHERE id = p_service;
    END IF;
    v_row := booking_take_place(
        p_id, p_patient, p_user, p_facility, p_doctor, p_service, p_schedule, p_start, p_end, p_mode,
        CASE WHEN p_held THEN 'held' ELSE 'booked' END, p_hold_expires, p_invoice, p_reason, p_capacity);
    IF v_row.id IS NULL THEN
        IF p_held THEN  -- cannot happen under the day lock; the invoice must not stay behind
            RAISE EXCEPTION 'slot_taken' USING DETAIL = 'every place of the slot is held';
        END IF;
        outcome := 'slot_taken';
        RETURN;
    END IF;
    INSERT INTO notifications (user_id, kind, params, facility_id, subject, dedupe_key, not_before, next_attempt_at)
    SELECT n.user_id, n.kind, n.params::jsonb, p_facility, 'appointment:' || v_row.id::text, n.dedupe_key,
           coalesce(n.not_before, now()), coalesce(n.not_before, now())
      FROM unnest(p_note_users, p_note_kinds, p_note_params, p_note_keys, p_note_times)
           AS n(user_id, kind, params, dedupe_key, not_before)
    ON CONFLICT (dedupe_key) DO NOTHING;
    INSERT INTO idempotency_keys (user_id, key, route, request_hash, status_code, response)
    VALUES (p_user, p_key, p_route, p_hash, 201,
            jsonb_set(p_response, '{queue_number}', coalesce(to_jsonb(v_row.queue_number), 'null'::jsonb)));
    outcome := 'booked';
    number := v_row.queue_number;
END
$$;
