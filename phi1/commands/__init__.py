"""Command lines that join two packages of the top layer, so they sit above both.

`tools/generate_synthetic.py` (`phi1.commands.synthetic`) runs the synthetic generator of `phi1.quality` with the
program sandbox of `phi1.eval`; `tools/decontaminate.py` (`phi1.commands.decontaminate`) prunes with
`phi1.quality.decontamination` and writes the contamination index that `phi1.eval.contamination` reads. `eval`
already imports `quality`, so neither command can live in `quality` without a cycle. A command over one package
lives in that package (`phi1.data.preprocess`, `phi1.quality.filter_cli`, ...). Nothing in phi1 imports this
package.
"""
