"""Training: the SFT step and loop, optimiser, checkpointed runs, evaluation, metrics, the memory planner;
`rl/` holds the Cascade RL stages (MPO offline, GSPO online)."""
