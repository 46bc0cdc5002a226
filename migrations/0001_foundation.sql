-- Foundation: identity, sessions, the facility directory and staff.
-- Extensions present on both the embedded PostgreSQL 18 and a plain PostgreSQL 15 with contrib.
CREATE EXTENSION IF NOT EXISTS unaccent;
CREATE EXTENSION IF NOT EXISTS pg_trgm;
CREATE EXTENSION IF NOT EXISTS btree_gist;

-- Case- and diacritic-insensitive form used by every search (đ/Đ fold to d).
-- IMMUTABLE so generated columns and indexes can use it; the dictionary is named explicitly.
CREATE FUNCTION fold_text(text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
    AS $$ SELECT lower(public.unaccent('public.unaccent'::regdictionary, $1)) $$;

CREATE FUNCTION join_words(text[]) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT coalesce(array_to_string($1, ' '), '') $$;

CREATE TABLE users (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    personal_id text NOT NULL UNIQUE CHECK (personal_id ~ '^[0-9]{12}$'),
    full_name text NOT NULL,
    birthdate date NOT NULL,
    sex text NOT NULL CHECK (sex IN ('male', 'female')),
    phone text,
    health_insurance_number text,
    locale text NOT NULL DEFAULT 'vi' CHECK (locale IN ('vi', 'en')),
    -- Access tokens issued before this instant are refused (logout everywhere).
    tokens_valid_after timestamptz NOT NULL DEFAULT '-infinity',
    last_sign_in_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Guardianship comes only from VNeID's dependents claim or a staff action.
CREATE TABLE guardianships (
    guardian_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    dependent_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    relationship text NOT NULL,
    source text NOT NULL CHECK (source IN ('vneid', 'staff')),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (guardian_id, dependent_id),
    CHECK (guardian_id <> dependent_id)
);
CREATE INDEX guardianships_dependent ON guardianships (dependent_id);

-- One session per sign-in: the refresh-token family.
CREATE TABLE auth_sessions (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz,
    revoke_reason text
);
CREATE INDEX auth_sessions_user ON auth_sessions (user_id);

CREATE TABLE refresh_tokens (
    token_hash bytea PRIMARY KEY,
    session_id uuid NOT NULL REFERENCES auth_sessions (id) ON DELETE CASCADE,
    expires_at timestamptz NOT NULL,
    spent_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX refresh_tokens_session ON refresh_tokens (session_id);

CREATE TABLE facilities (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    code text NOT NULL UNIQUE,
    name text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('provincial_hospital', 'specialist_centre', 'district_medical_centre',
                                       'commune_station', 'private_clinic')),
    district text NOT NULL,
    address text NOT NULL,
    phone text,
    latitude double precision CHECK (latitude BETWEEN -90 AND 90),
    longitude double precision CHECK (longitude BETWEEN -180 AND 180),
    opening_hours jsonb NOT NULL DEFAULT '[]',
    is_demo boolean NOT NULL DEFAULT false,
    search_text text GENERATED ALWAYS AS (fold_text(name || ' ' || district || ' ' || address)) STORED,
    district_key text GENERATED ALWAYS AS (fold_text(district)) STORED,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX facilities_search ON facilities USING gin (search_text gin_trgm_ops);
CREATE INDEX facilities_order ON facilities (name, id);

CREATE TABLE services (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    facility_id uuid NOT NULL REFERENCES facilities (id) ON DELETE CASCADE,
    code text NOT NULL,
    name text NOT NULL,
    duration_minutes integer NOT NULL CHECK (duration_minutes BETWEEN 5 AND 480),
    price_vnd bigint NOT NULL CHECK (price_vnd >= 0),
    video_offered boolean NOT NULL DEFAULT false,
    prepayment_required boolean NOT NULL DEFAULT false,
    active boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (facility_id, code)
);
CREATE INDEX services_order ON services (facility_id, name, id);

CREATE TABLE doctors (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    facility_id uuid NOT NULL REFERENCES facilities (id) ON DELETE CASCADE,
    code text NOT NULL,
    -- Links the directory entry to the person who signs in; never shown to the public.
    personal_id text CHECK (personal_id ~ '^[0-9]{12}$'),
    full_name text NOT NULL,
    title text NOT NULL DEFAULT '',
    specialties text[] NOT NULL DEFAULT '{}',
    languages text[] NOT NULL DEFAULT '{vi}',
    video boolean NOT NULL DEFAULT false,
    active boolean NOT NULL DEFAULT true,
    search_text text GENERATED ALWAYS AS (fold_text(full_name || ' ' || title || ' ' || join_words(specialties))) STORED,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (facility_id, code)
);
CREATE INDEX doctors_search ON doctors USING gin (search_text gin_trgm_ops);
CREATE INDEX doctors_order ON doctors (full_name, id);
CREATE UNIQUE INDEX doctors_person ON doctors (facility_id, personal_id) WHERE personal_id IS NOT NULL;

-- Staff roles are granted to a personal ID at a facility, possibly before the person first signs in.
CREATE TABLE staff (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    personal_id text NOT NULL CHECK (personal_id ~ '^[0-9]{12}$'),
    facility_id uuid NOT NULL REFERENCES facilities (id) ON DELETE CASCADE,
    role text NOT NULL CHECK (role IN ('doctor', 'facility_staff', 'admin')),
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (personal_id, facility_id, role)
);
CREATE INDEX staff_facility ON staff (facility_id);
