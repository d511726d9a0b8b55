"""Synthetic textbook sections and exercises from any OpenAI-compatible endpoint (the paper's GPT-3.5 data).

    python tools/generate_synthetic.py --output data/synthetic/run1.jsonl --textbooks 1000 --exercises 1000 \
        --base-url http://127.0.0.1:8000/v1 --model phi1 [--api chat|completions] [--lists configs/synthetic] \
        [--concurrency 8] [--requests-per-minute 600] [--max-attempts 3]

--base-url and --api-key default to OPENAI_BASE_URL and OPENAI_API_KEY. --max-tokens defaults to what fits the
teacher's context when its /v1/models says it (`max_model_len`, as phi1-serve and vLLM report; 512 at most, room
kept for the prompt), else 512; a request the endpoint refuses (a context too small, a wrong model name) ends
the run with one line saying what to change. Each record draws a topic, an audience
and a style (and an exercise a function name) from the lists in --lists (replace the .txt files to change them).
Output lines are appended with fsync; rerunning the same command resumes: finished ids are skipped, a torn last
line is cut. Every id ends as one line with status "ok" or "rejected" (see phi1/quality/synthetic.py). The run
ends with counts per kind/status, topic and audience; --counts writes them as JSON.

The logic lives in `phi1.commands.synthetic`; this script is its command line.
"""

from phi1.cli import run_cli
from phi1.commands.synthetic import main

if __name__ == "__main__":
    run_cli(main, prog="generate_synthetic.py")
