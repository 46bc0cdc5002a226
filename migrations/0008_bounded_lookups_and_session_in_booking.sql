-- A booking could read the doctor's whole history. The booking functions of migration 0006 keep
-- generic plans, and while `appointments` had no statistics (a new database before autovacuum's
-- first ANALYZE, or autovacuum off, as on the benchmark machines) PostgreSQL's generic plan for
-- "places taken in this slot" scanned the exclusion constraint's GiST index on `doctor_id = $1`
-- alone, reading every appointment the doctor ever had and filtering on time (9,199 rows and
-- 3.8 ms for a doctor with 9,200 visits; bench/README.md, "Booking"); the check for stale holds
-- in the way read every doctor's appointments of that day. With statistics the planner chose
-- the btree, but a kept plan is only as good as the statistics it was made with.
--
-- Each overlap lookup now names its doctor (or patient) together with both a time bound the
-- btree index can use and the range overlap the GiST index can use, so whichever index the plan
-- picks reads only the appointments near that time. The count lives in one function,
-- booking_places_taken; book_appointment, booking_take_place and booking_patient_refusal are
-- the 0006 functions with their lookups written this way (and book_appointment's two answers
-- to a used Idempotency-Key in one function, booking_key_used).
--
-- book_appointment also checks the caller's session itself (live_session, the rule the
-- bearer check applies to every other request), so a booking is one round trip instead of two:
-- on this kind of machine each round trip costs the API about 0.1 ms of CPU.

-- Places of the doctor's slot held right now (a hold counts until it expires). Called from the
-- functions below, whose plan settings it runs under.
CREATE FUNCTION booking_places_taken(p_doctor uuid, p_start timestamptz, p_end timestamptz) RETURNS bigint
    LANGUAGE plpgsql AS $$
BEGIN
    RETURN (SELECT count(*) FROM appointments
             WHERE doctor_id = p_doctor AND starts_at > p_start - interval '1 day' AND starts_at < p_end
               AND tstzrange(starts_at, ends_at) && tstzrange(p_start, p_end)
               AND status IN ('held', 'booked', 'checked_in', 'completed')
               AND (status <> 'held' OR hold_expires_at > now()));
END
$$;

CREATE OR REPLACE FUNCTION booking_patient_refusal(
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
                  AND tstzrange(starts_at, ends_at) && tstzrange(p_start, p_end)
                  AND id IS DISTINCT FROM p_moving
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

CREATE OR REPLACE FUNCTION booking_take_place(
    p_id uuid, p_patient uuid, p_booked_by uuid, p_facility uuid, p_doctor uuid, p_service uuid,
    p_schedule uuid, p_start timestamptz, p_end timestamptz, p_mode text, p_status text,
    p_hold_expires timestamptz, p_invoice uuid, p_reason text, p_capacity integer
) RETURNS appointments LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $$
DECLARE
    v_day date := clinic_day(p_start);
    v_number integer;
    v_row appointments;
BEGIN
    -- booking_lock_day, written out.
    PERFORM pg_advisory_xact_lock(hashtextextended('slots:' || p_doctor::text || ':' || to_char(v_day, 'YYYY-MM-DD'), 0));
    IF booking_places_taken(p_doctor, p_start, p_end) >= p_capacity THEN
        RETURN NULL;
    END IF;
    -- A hold past its time still marked `held`, the doctor's in this slot or the patient's at this
    -- time, is expired before it can block the insert.
    IF EXISTS (SELECT 1 FROM appointments
                WHERE doctor_id = p_doctor AND starts_at > p_start - interval '1 day' AND starts_at < p_end
                  AND tstzrange(starts_at, ends_at) && tstzrange(p_start, p_end)
                  AND status = 'held' AND hold_expires_at <= now())
       OR EXISTS (SELECT 1 FROM appointments
                   WHERE patient_id = p_patient AND starts_at > p_start - interval '1 day' AND starts_at < p_end
                     AND tstzrange(starts_at, ends_at) && tstzrange(p_start, p_end)
                     AND status = 'held' AND hold_expires_at <= now()) THEN
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

-- The answer to a request under an Idempotency-Key used before: `replay` with the kept status and
-- body for the same request, `idempotency_key_reused` for another; all NULL for a new key.
CREATE FUNCTION booking_key_used(
    p_user uuid, p_key text, p_hash bytea, OUT outcome text, OUT replay_status integer, OUT replay_body jsonb
) LANGUAGE plpgsql AS $$
DECLARE
    v_seen record;
BEGIN
    SELECT request_hash, status_code, response INTO v_seen
      FROM idempotency_keys WHERE user_id = p_user AND key = p_key;
    IF NOT FOUND THEN
        RETURN;
    ELSIF v_seen.request_hash <> p_hash THEN
        outcome := 'idempotency_key_reused';
    ELSE
        outcome := 'replay';
        replay_status := v_seen.status_code;
        replay_body := v_seen.response;
    END IF;
END
$$;

-- A signed-in session is live: not revoked, and its access token issued (p_issued_at, Unix
-- seconds) after the user's last "log out everywhere". The bearer check of every request
-- (api/identity/queries.py) and book_appointment apply this one rule. A set-returning SQL
-- function, so that PostgreSQL inlines it into the query that uses it and plans it there once
-- (a scalar one with a sub-select would be planned again on every call).
CREATE FUNCTION live_session(p_user uuid, p_session uuid, p_issued_at bigint) RETURNS TABLE (user_id uuid)
    LANGUAGE sql STABLE AS $$
    SELECT s.user_id FROM auth_sessions s JOIN users u ON u.id = s.user_id
     WHERE s.id = p_session AND s.user_id = p_user AND s.revoked_at IS NULL
       AND u.tokens_valid_after < to_timestamp(p_issued_at + 1)
$$;

-- The session arguments are new, so the 0006 function goes.
DROP FUNCTION book_appointment(
    uuid, text, text, bytea, jsonb, uuid, uuid, uuid, uuid, uuid, uuid, timestamptz, timestamptz, text, integer,
    boolean, timestamptz, uuid, text, bigint, integer, uuid[], text[], text[], text[], timestamptz[]);

-- POST /v1/appointments in one statement, with the outcomes migration 0006 lists, and
-- `invalid_token` (nothing else looked at) when the caller's session is not live.
CREATE FUNCTION book_appointment(
    p_session uuid, p_issued_at bigint,
    p_user uuid, p_key text, p_route text, p_hash bytea, p_response jsonb,
    p_id uuid, p_patient uuid, p_facility uuid, p_doctor uuid, p_service uuid, p_schedule uuid,
    p_start timestamptz, p_end timestamptz, p_mode text, p_capacity integer,
    p_held boolean, p_hold_expires timestamptz, p_invoice uuid, p_reason text,
    p_schedule_version bigint, p_max_per_facility integer,
    p_note_users uuid[], p_note_kinds text[], p_note_params text[], p_note_keys text[], p_note_times timestamptz[],
    OUT outcome text, OUT replay_status integer, OUT replay_body jsonb, OUT number integer
) LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $$
DECLARE
    v_refusal text;
    v_row appointments;
BEGIN
    -- The bearer check, for this route made here (api/identity/current_user.py).
    IF NOT EXISTS (SELECT 1 FROM live_session(p_user, p_session, p_issued_at)) THEN
        outcome := 'invalid_token';
        RETURN;
    END IF;
    -- When a clinic's morning opens most requests are for places already gone: say so before
    -- taking any lock (the constraint still decides the close calls). A retry of a booking that
    -- took the last place is answered as before.
    IF booking_places_taken(p_doctor, p_start, p_end) >= p_capacity THEN
        SELECT * INTO outcome, replay_status, replay_body FROM booking_key_used(p_user, p_key, p_hash);
        outcome := coalesce(outcome, 'slot_taken');
        RETURN;
    END IF;
    IF coalesce((SELECT version FROM slot_versions WHERE doctor_id = p_doctor AND day = '-infinity'), 0)
       <> p_schedule_version THEN
        outcome := 'stale';
        RETURN;
    END IF;
    -- The key, as api/idempotency.py claims it: a retry racing the original waits, then replays.
    PERFORM pg_advisory_xact_lock(hashtextextended(p_user::text || ':' || p_key, 0));
    SELECT * INTO outcome, replay_status, replay_body FROM booking_key_used(p_user, p_key, p_hash);
    IF outcome IS NOT NULL THEN
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
        IF booking_places_taken(p_doctor, p_start, p_end) >= p_capacity THEN
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
