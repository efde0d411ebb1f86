-- Who holds an in-flight claim: a fresh id per claiming request. Completing
-- or releasing a claim names it, so a request whose claim was taken over
-- after its lease ended can neither overwrite nor free the new holder's.
ALTER TABLE idempotency_keys ADD COLUMN owner TEXT NOT NULL DEFAULT '';
