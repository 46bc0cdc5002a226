-- Booking: schedules (weekly templates in clinic time), their exceptions, appointments with
-- double booking made impossible by an exclusion constraint, invoices for prepaid services,
-- gap-free queue numbers, idempotency keys, and the waitlist.

CREATE TABLE schedules (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    facility_id uuid NOT NULL REFERENCES facilities (id) ON DELETE CASCADE,
    doctor_id uuid NOT NULL REFERENCES doctors (id) ON DELETE CASCADE,
    -- Slots are as long as the service; a schedule offers one service.
    service_id uuid NOT NULL REFERENCES services (id) ON DELETE CASCADE,
    -- [{"weekday": 1..7 (ISO, Monday = 1), "start": "07:30", "end": "11:30"}], clinic time.
    weekly jsonb NOT NULL,
    capacity integer NOT NULL DEFAULT 1 CHECK (capacity BETWEEN 1 AND 200),
    buffer_minutes integer NOT NULL DEFAULT 0 CHECK (buffer_minutes BETWEEN 0 AND 240),
    modes text[] NOT NULL CHECK (modes <@ ARRAY['in_person', 'video'] AND cardinality(modes) > 0),
    -- A day's slots open `horizon_days` ahead, at `release_time` clinic time.
    horizon_days integer NOT NULL DEFAULT 30 CHECK (horizon_days BETWEEN 0 AND 366),
    release_time time NOT NULL DEFAULT '07:00',
    valid_from date NOT NULL,
    valid_until date,
    active boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CHECK (valid_until IS NULL OR valid_until >= valid_from)
);
CREATE INDEX schedules_doctor ON schedules (doctor_id) WHERE active;
CREATE INDEX schedules_facility ON schedules (facility_id, service_id) WHERE active;

-- A day (or part of one) a schedule does not run: leave, a holiday, a training day.
CREATE TABLE schedule_exceptions (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    schedule_id uuid NOT NULL REFERENCES schedules (id) ON DELETE CASCADE,
    day date NOT NULL,
    -- Both null: the whole day.
    start_time time,
    end_time time,
    reason text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK ((start_time IS NULL) = (end_time IS NULL)),
    CHECK (start_time IS NULL OR start_time < end_time)
);
CREATE INDEX schedule_exceptions_day ON schedule_exceptions (schedule_id, day);

-- What a patient owes. Payments (a later migration) add attempts and the ledger.
CREATE TABLE invoices (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    patient_id uuid NOT NULL REFERENCES users (id),
    facility_id uuid NOT NULL REFERENCES facilities (id),
    service_id uuid REFERENCES services (id),
    amount_vnd bigint NOT NULL CHECK (amount_vnd >= 0),
    status text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'paid', 'refunded', 'partially_refunded', 'void')),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX invoices_patient ON invoices (patient_id, created_at DESC);

CREATE TABLE appointments (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    patient_id uuid NOT NULL REFERENCES users (id),
    booked_by uuid NOT NULL REFERENCES users (id),
    facility_id uuid NOT NULL REFERENCES facilities (id),
    doctor_id uuid NOT NULL REFERENCES doctors (id),
    service_id uuid NOT NULL REFERENCES services (id),
    schedule_id uuid NOT NULL REFERENCES schedules (id),
    starts_at timestamptz NOT NULL,
    ends_at timestamptz NOT NULL,
    mode text NOT NULL CHECK (mode IN ('in_person', 'video')),
    status text NOT NULL
        CHECK (status IN ('held', 'booked', 'checked_in', 'completed', 'expired', 'cancelled', 'no_show')),
    -- Which of the slot's `capacity` places this is (1 for a doctor's visit).
    seat integer NOT NULL CHECK (seat >= 1),
    hold_expires_at timestamptz,
    invoice_id uuid REFERENCES invoices (id),
    -- Per doctor per clinic day, in-person visits only, gap-free: taken from queue_counters in
    -- the transaction that books.
    queue_day date,
    queue_number integer,
    reason text,
    cancelled_at timestamptz,
    checked_in_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CHECK (ends_at > starts_at),
    CHECK ((status = 'held') <= (hold_expires_at IS NOT NULL)),
    UNIQUE (doctor_id, queue_day, queue_number),
    -- No double booking, decided by PostgreSQL: a doctor's place `seat` is taken at most once
    -- at any instant by an appointment that still holds its slot. An expired hold or a
    -- cancelled visit no longer does.
    CONSTRAINT appointments_no_double_booking EXCLUDE USING gist (
        doctor_id WITH =, seat WITH =, tstzrange(starts_at, ends_at) WITH &&
    ) WHERE (status IN ('held', 'booked', 'checked_in', 'completed')),
    -- Nobody is in two places at once.
    CONSTRAINT appointments_patient_not_twice EXCLUDE USING gist (
        patient_id WITH =, tstzrange(starts_at, ends_at) WITH &&
    ) WHERE (status IN ('held', 'booked', 'checked_in'))
);
CREATE INDEX appointments_patient ON appointments (patient_id, facility_id, starts_at);
-- Overlap lookups are written `tstzrange(starts_at, ends_at) && tstzrange(...)` with the
-- constraints' status lists, so the exclusion constraints' GiST indexes bound them.
CREATE INDEX appointments_doctor_time ON appointments (doctor_id, starts_at)
    WHERE status IN ('held', 'booked', 'checked_in', 'completed');
CREATE INDEX appointments_facility_day ON appointments (facility_id, starts_at);
CREATE INDEX appointments_holds ON appointments (hold_expires_at) WHERE status = 'held';

CREATE TABLE queue_counters (
    doctor_id uuid NOT NULL REFERENCES doctors (id) ON DELETE CASCADE,
    day date NOT NULL,
    last_number integer NOT NULL,
    PRIMARY KEY (doctor_id, day)
);

-- POSTs that create something take an Idempotency-Key: the first response is kept and given
-- again for the same key and body.
CREATE TABLE idempotency_keys (
    user_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    key text NOT NULL,
    route text NOT NULL,
    request_hash bytea NOT NULL,
    status_code integer NOT NULL,
    response jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key)
);

CREATE TABLE waitlist_entries (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    patient_id uuid NOT NULL REFERENCES users (id),
    requested_by uuid NOT NULL REFERENCES users (id),
    facility_id uuid NOT NULL REFERENCES facilities (id),
    doctor_id uuid REFERENCES doctors (id),
    service_id uuid REFERENCES services (id),
    date_from date NOT NULL,
    date_to date NOT NULL,
    mode text CHECK (mode IN ('in_person', 'video')),
    status text NOT NULL DEFAULT 'waiting'
        CHECK (status IN ('waiting', 'offered', 'accepted', 'lapsed', 'cancelled')),
    -- While offered: the held appointment kept for this entry.
    offer_appointment_id uuid REFERENCES appointments (id),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CHECK (doctor_id IS NOT NULL OR service_id IS NOT NULL),
    CHECK (date_to >= date_from)
);
CREATE INDEX waitlist_waiting ON waitlist_entries (facility_id, created_at) WHERE status = 'waiting';
CREATE INDEX waitlist_patient ON waitlist_entries (patient_id, created_at DESC);
