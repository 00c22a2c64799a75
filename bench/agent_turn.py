"""A voice agent's turns through the Pipecat and LiveKit adapters, with the rest of the bench:

    python bench/agent_turn.py --size tiny --threads 1 --json bench/results/agent-turn-tiny-cpu.json
    python bench/agent_turn.py --size full --quantize int8 --streams 1 --frames 4 --agent-turns 3 --json ...

The same as `python -m csm_plugin.bench --agent-turn ...` (the code lives in the installed package:
csm_plugin/bench_agent_turn.py, with the service figures in csm_plugin/bench.py). Every option of
that command works here; see --help.
"""

from __future__ import annotations

import sys

from csm_plugin.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(main(["bench", *(argv if "--agent-turn" in argv else ["--agent-turn", *argv])]))
