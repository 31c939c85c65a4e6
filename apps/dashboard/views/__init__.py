"""The product's pages: one module per page family, each a thin view over another app's selectors."""
