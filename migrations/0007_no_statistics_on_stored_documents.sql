-- ANALYZE (autovacuum's, or anyone's) sorts every column it samples. The JSON documents kept whole
-- for the record (a provider's callback payload, a notification's parameters, the response kept
-- for an Idempotency-Key) are never filtered, joined or sorted on, so their statistics guide no
-- plan, yet sorting them by jsonb comparison is most of the work: ANALYZE of 24,000 stored VNPay
-- callbacks took 110-128 ms with statistics on the payload and 13-17 ms without. These tables
-- grow with every booking and payment, so autovacuum analyses them often.
ALTER TABLE payment_callbacks ALTER COLUMN payload SET STATISTICS 0;
ALTER TABLE notifications ALTER COLUMN params SET STATISTICS 0;
ALTER TABLE idempotency_keys ALTER COLUMN response SET STATISTICS 0;
