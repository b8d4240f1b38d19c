"""Ray-distributed hyperparameter search for a digit localizer on 75x75 canvases."""
