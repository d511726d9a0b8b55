"""Data-quality tools of the phi-1 paper (section 2): a classifier on code embeddings that keeps "textbook
quality" files, synthetic textbooks and exercises with forced diversity, and decontamination against the
benchmarks (n-gram overlap, embedding distance, AST match rate)."""
