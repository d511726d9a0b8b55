"""Removes training documents that overlap HumanEval (and MBPP when given), the paper's three ways.

    python tools/decontaminate.py --input data/train.jsonl --output data/train.clean.jsonl \
        --report runs/decontamination.jsonl [--mbpp data/mbpp.jsonl] [--ngram-n 13] [--tau 0.9] \
        [--embedding-model runs/phi1-tiny --embedding-threshold 0.05] [--workers 2] \
        [--index runs/decontamination_index.json]

Checks: n-gram overlap (hashed, one pass over the corpus), AST match rate of every function against each
solution (tau; the summary also counts the paper's 0.95 / 0.9 / 0.85 / 0.8), and L2 distance of mean embeddings
from a phi1 checkpoint. The report has one line per flagged (document, problem) pair with every score; the
output keeps the input's order. Non-JSON lines, records without the text key and code that does not parse are
counted and listed by file and line; --strict makes them an error (exit status 2).

--index also writes the contamination index: per benchmark problem, the best score of each check over the whole
corpus (down to AST tau 0.8, whatever --tau prunes at) and the document reaching it. `phi1-eval
--contamination-index` reads it to split pass@k into problems with and without a near match in the training
data (phi1/eval/contamination.py).

The logic lives in `phi1.commands.decontaminate`; this script is its command line.
"""

from phi1.cli import run_cli
from phi1.commands.decontaminate import main

if __name__ == "__main__":
    run_cli(main, prog="decontaminate.py")
