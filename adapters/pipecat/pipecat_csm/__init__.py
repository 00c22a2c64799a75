"""Pipecat adapter for csm-plugin."""
