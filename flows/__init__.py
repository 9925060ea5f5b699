"""Prefect flows for gptmini: `train-gpt` (raw text to a registered model), `promote-model`, and the
deployments that `flows.serve` serves (train-gpt/demo, train-gpt/retrain on a cron schedule,
promote-model/promote)."""
