"""Text-to-image pipelines at build time: the component table, pipeline-folder loading, export."""
