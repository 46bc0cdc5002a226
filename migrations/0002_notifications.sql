-- Notifications: the devices we push to, each user's preferences, and one table that is both
-- the user's inbox and the push outbox. Domain code inserts a row inside its own transaction,
-- so a notification exists if and only if the business change committed.

CREATE TABLE devices (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- An FCM registration token belongs to one app install; when it signs in as someone else
    -- the row is re-bound, never shared.
    token text NOT NULL UNIQUE CHECK (length(token) BETWEEN 1 AND 4096),
    platform text NOT NULL CHECK (platform IN ('android', 'ios', 'web')),
    locale text NOT NULL CHECK (locale IN ('vi', 'en')),
    active boolean NOT NULL DEFAULT true,
    -- Why FCM made us stop sending (UNREGISTERED, INVALID_ARGUMENT, SENDER_ID_MISMATCH).
    deactivated_reason text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX devices_user_active ON devices (user_id) WHERE active;

CREATE TABLE notification_preferences (
    user_id uuid PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    -- Quiet hours in clinic time (Asia/Ho_Chi_Minh); may wrap midnight (22:00 to 06:30).
    quiet_start time,
    quiet_end time,
    muted_categories text[] NOT NULL DEFAULT '{}',
    updated_at timestamptz NOT NULL DEFAULT now(),
    CHECK ((quiet_start IS NULL) = (quiet_end IS NULL)),
    CHECK (quiet_start <> quiet_end)
);

CREATE TABLE notifications (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    kind text NOT NULL,
    -- Ids and times only (checked per kind in notifications/templates.py): never health data.
    params jsonb NOT NULL DEFAULT '{}',
    -- The facility the message is about: its staff see the message if it dead-letters.
    facility_id uuid REFERENCES facilities (id) ON DELETE SET NULL,
    -- What it is about ('appointment:<id>'), so pending reminders can be moved or cancelled.
    subject text,
    dedupe_key text UNIQUE,
    -- Shown in the inbox and pushed from this time on.
    not_before timestamptz NOT NULL DEFAULT now(),
    created_at timestamptz NOT NULL DEFAULT now(),
    read_at timestamptz,
    -- The outbox. A worker claims a due row by moving next_attempt_at one lease ahead, so a
    -- worker that dies mid-send leaves the row to be claimed again when the lease runs out.
    push_state text NOT NULL DEFAULT 'pending'
        CHECK (push_state IN ('pending', 'sent', 'skipped', 'dead', 'cancelled')),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    attempts integer NOT NULL DEFAULT 0,
    last_error text,
    finished_at timestamptz
);
CREATE INDEX notifications_due ON notifications (next_attempt_at) WHERE push_state = 'pending';
CREATE INDEX notifications_inbox ON notifications (user_id, not_before DESC, id DESC);
CREATE INDEX notifications_subject ON notifications (subject) WHERE push_state = 'pending';
CREATE INDEX notifications_dead ON notifications (facility_id, finished_at DESC, id DESC)
    WHERE push_state = 'dead';

-- One row per device per attempt: what FCM answered. A retry skips devices already sent to.
-- device_id has no foreign key: a device deleted while its push was in flight must not make
-- the worker's record of the whole batch fail.
CREATE TABLE push_deliveries (
    notification_id uuid NOT NULL REFERENCES notifications (id) ON DELETE CASCADE,
    device_id uuid NOT NULL,
    attempt integer NOT NULL,
    outcome text NOT NULL CHECK (outcome IN ('sent', 'token_rejected', 'failed')),
    fcm_message_id text,
    error text,
    at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (notification_id, device_id, attempt)
);

-- Wake the workers at commit instead of waiting for their next poll.
CREATE FUNCTION wake_notification_workers() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('notification_outbox', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER notifications_wake_workers AFTER INSERT ON notifications
    FOR EACH STATEMENT EXECUTE FUNCTION wake_notification_workers();
