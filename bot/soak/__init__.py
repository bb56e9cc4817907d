"""The chaos soak (`python -m bot.soak`): tuneops' real processes under faults on a seeded schedule; see
`bot.soak.driver`. `bot.soak.harness` starts and kills the processes (also for tests/bot/test_faults.py), and
`bot.soak.trainer` is the fast stand-in trainer the runs use."""
