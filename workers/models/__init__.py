"""Example models. `ledger` is the default (PREVALENCE_MODEL=workers.models.ledger:model)."""
