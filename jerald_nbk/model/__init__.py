"""The JERALD model: parameter tables, displacement layers, final transforms, the pipeline."""
