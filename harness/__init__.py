"""Frozen-feature evaluation harness: tasks, feature cache, probes, statistics and leaderboards."""
