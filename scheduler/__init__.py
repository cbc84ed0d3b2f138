"""The control plane's core: job state (the database is its source of truth), leases, dispatch to
workers, the worker agent that supervises a trainer, tenancy and metering records, and the CLI."""
