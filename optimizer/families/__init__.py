"""Model families as data: what each family is made of and what every stage may do with it."""

from optimizer.families.table import FAMILIES, Family, family_named, family_of_pipeline, pipeline_classes

__all__ = ["FAMILIES", "Family", "family_named", "family_of_pipeline", "pipeline_classes"]
