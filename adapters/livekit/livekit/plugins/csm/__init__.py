"""LiveKit Agents plugin for csm-plugin."""
