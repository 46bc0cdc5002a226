-- Payments: per-facility provider accounts, payment attempts (only one per invoice can
-- succeed), every callback as received, provider transactions applied at most once, an
-- append-only money ledger from which the invoice state is derived, refunds, and bank
-- transfers nobody could match.

CREATE TABLE payment_accounts (
    facility_id uuid NOT NULL REFERENCES facilities (id) ON DELETE CASCADE,
    provider text NOT NULL CHECK (provider IN ('vnpay', 'momo', 'zalopay', 'vietqr')),
    enabled boolean NOT NULL DEFAULT true,
    -- Merchant codes, endpoints, bank BIN and account number: what is not secret.
    config jsonb NOT NULL DEFAULT '{}',
    -- {"name": ["current", "previous"]}: the first signs, every one verifies (a key is
    -- rotated with two active).
    secrets jsonb NOT NULL DEFAULT '{}',
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (facility_id, provider)
);

CREATE TABLE payment_attempts (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    invoice_id uuid NOT NULL REFERENCES invoices (id),
    provider text NOT NULL CHECK (provider IN ('vnpay', 'momo', 'zalopay', 'vietqr')),
    -- What the provider knows the order by: vnp_TxnRef, MoMo orderId, ZaloPay app_trans_id,
    -- or the VietQR transfer memo.
    order_ref text NOT NULL,
    amount_vnd bigint NOT NULL CHECK (amount_vnd > 0),
    -- refunded: it was paid after another attempt had already paid the invoice, and is given back.
    status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'paid', 'failed', 'expired', 'refunded')),
    expires_at timestamptz NOT NULL,
    provider_transaction_id text,
    -- What the app was given: a pay URL, a deeplink or a QR payload (no secrets in any).
    redirect_url text,
    deeplink text,
    qr_payload text,
    last_checked_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (provider, order_ref)
);
-- One invoice, several attempts, at most one paid.
CREATE UNIQUE INDEX payment_attempts_one_paid ON payment_attempts (invoice_id) WHERE status = 'paid';
CREATE INDEX payment_attempts_invoice ON payment_attempts (invoice_id, created_at);
CREATE INDEX payment_attempts_unanswered ON payment_attempts (expires_at) WHERE status = 'pending';

-- Every callback as it came in (signatures and secrets redacted), with what we made of it.
CREATE TABLE payment_callbacks (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    provider text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    payload jsonb NOT NULL,
    signature_valid boolean NOT NULL,
    attempt_id uuid REFERENCES payment_attempts (id),
    provider_transaction_id text,
    outcome text NOT NULL,
    source text NOT NULL DEFAULT 'callback' CHECK (source IN ('callback', 'reconciliation'))
);
CREATE INDEX payment_callbacks_attempt ON payment_callbacks (attempt_id, received_at);

-- A provider transaction changes our state at most once, however often it is reported.
CREATE TABLE applied_transactions (
    provider text NOT NULL,
    provider_transaction_id text NOT NULL,
    attempt_id uuid NOT NULL REFERENCES payment_attempts (id),
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, provider_transaction_id)
);

-- Money that moved. Append-only: the invoice's state is derived from these rows.
CREATE TABLE ledger_entries (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    invoice_id uuid NOT NULL REFERENCES invoices (id),
    attempt_id uuid REFERENCES payment_attempts (id),
    kind text NOT NULL CHECK (kind IN ('payment', 'refund')),
    amount_vnd bigint NOT NULL CHECK (amount_vnd > 0),
    provider text NOT NULL,
    reference text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_entries_invoice ON ledger_entries (invoice_id, id);

CREATE FUNCTION ledger_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger_entries is append-only';
END
$$;
CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_is_append_only();

CREATE TABLE refunds (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    invoice_id uuid NOT NULL REFERENCES invoices (id),
    attempt_id uuid NOT NULL REFERENCES payment_attempts (id),
    amount_vnd bigint NOT NULL CHECK (amount_vnd > 0),
    -- manual: a VietQR transfer is refunded by hand by the facility's cashier.
    status text NOT NULL CHECK (status IN ('requested', 'done', 'failed', 'manual')),
    reason text NOT NULL,
    provider_refund_id text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX refunds_invoice ON refunds (invoice_id);

-- Incoming transfers that matched no open payment (unknown memo, wrong amount): kept for staff.
CREATE TABLE unmatched_transfers (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    reference text NOT NULL UNIQUE,
    account text NOT NULL,
    amount_vnd bigint NOT NULL,
    memo text NOT NULL,
    received_at timestamptz NOT NULL,
    reason text NOT NULL,
    facility_id uuid REFERENCES facilities (id),
    resolved_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);
