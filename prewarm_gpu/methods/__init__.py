"""The related initialisations of the source documents; each module registers its entries."""
