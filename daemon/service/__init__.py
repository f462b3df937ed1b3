"""The daemon: Kafka intake, crash-safe rounds, the ledger, receipts, audit trail and metrics."""
