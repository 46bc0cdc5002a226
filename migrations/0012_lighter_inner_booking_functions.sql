-- Less work inside every booking, none of it a rule.
--
-- booking_take_place counted the slot's places again under the doctor's day lock before it
-- inserted. The count decides nothing there: the exclusion constraint does, one seat after
-- another, and the place can be gone only in the moment between book_appointment's own count
-- (which answers most `slot_taken`s before any lock) and that lock, when the seats' inserts all
-- find it taken and the function raises `slot_taken` as before. A prepaid booking counts under
-- the lock in book_appointment itself, before its invoice.
--
-- booking_take_place and booking_patient_refusal also lose their SET clauses: each call of a
-- function with settings saves and restores them, and book_appointment, their caller on the
-- busy path, already runs with the same ones, which PostgreSQL keeps in force in the functions
-- it calls. The rare other callers (moving a visit, a late payment taking its slot again) plan
-- with the session's defaults, as every other query does.
--
-- Three runs each, alternated: PostgreSQL CPU per booking 0.836 -> 0.807 ms (-3.5 %); bookings/s
-- hardly move (+1 %), as the API process is the queue there (bench/README.md, "Booking").
ALTER FUNCTION booking_patient_refusal(uuid, uuid, timestamptz, timestamptz, uuid, integer) RESET ALL;

CREATE OR REPLACE FUNCTION booking_take_place(
    p_id uuid, p_patient uuid, p_booked_by uuid, p_facility uuid, p_doctor uuid, p_service uuid,
    p_schedule uuid, p_start timestamptz, p_end timestamptz, p_mode text, p_status text,
    p_hold_expires timestamptz, p_invoice uuid, p_reason text, p_capacity integer
) RETURNS appointments LANGUAGE plpgsql AS $$
DECLARE
    v_day date := clinic_day(p_start);
    v_number integer;
    v_row appointments;
BEGIN
    -- booking_lock_day, written out.
    PERFORM pg_advisory_xact_lock(hashtextextended('slots:' || p_doctor::text || ':' || to_char(v_day, 'YYYY-MM-DD'), 0));
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
