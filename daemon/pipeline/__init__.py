"""The daemon's pipeline: Kafka intake, batching, crash-safe rounds and their commit, the ledger, receipts,
audit trail and metrics, wired by ``assembly`` and run by ``lifecycle``."""
