"""How a run reads its data: detectron2 loaders for training and evaluation, and the data
position and random states a periodic checkpoint saves so a resumed run continues exactly.

A package of its own, beside the dataset kinds: the registry imports every public module of
`peftseg.data` to collect the registered datasets, and only this package's (empty) top, so
the detectron2 imports of these modules load when a run needs them.
"""
