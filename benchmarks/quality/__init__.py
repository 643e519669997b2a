"""Quality benchmark: ANP of every engine method on merges of GLUE experts (DivMerge, Table 6 style)."""
