"""Benchmarks behind `mstar bench`: each module measures one engine against its `transformers` reference."""
