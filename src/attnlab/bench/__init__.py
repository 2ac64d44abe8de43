"""`attnlab bench`: timing, memory and FLOPs of every mechanism against SDPA, measured in the same run.

Modules, each importing only those below it:

    cli                      the command: arguments, names and options checked, the modes run
    numerics, neighborhood,  the --numerics, --neighborhood and --spatial modes
      spatial
    harness, report          measuring processes and measure(); rows, table, plot
    worker                   the measuring process: time and memory jobs
    timing                   the one timing loop, shared by the worker and the modes
    adapters, flops          what is timed (baseline, layout wrappers, options); FLOP counting
"""
from attnlab.bench.adapters import parse_options
from attnlab.bench.cli import add_arguments, main
from attnlab.bench.harness import measure
from attnlab.bench.report import iqr, median

__all__ = ["measure", "median", "iqr", "parse_options", "add_arguments", "main"]
