"""Tools that make datasets on disk (``vsd-run data``): package download, mesh readers, mesh
rendering, the Minens character creator, folder checks and the preparers a recipe can run on
first use. They build on the dataset plugins (they write what those read) and the renderers."""
