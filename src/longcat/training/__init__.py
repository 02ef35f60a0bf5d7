"""Training: the loop, optimizer and schedules, the expert-bias budget controller, the balance loss,
stability monitors, checkpoints and determinism. Policies that change state between steps live here,
never in model/."""
