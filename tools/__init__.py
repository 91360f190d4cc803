"""tools/ — one-off converters: tools/prepare_nyu.py turns the official NYU Depth V2 .mat into
the data/nyu layout data.py reads (where MultiMAE's users look for one, tools/)."""
