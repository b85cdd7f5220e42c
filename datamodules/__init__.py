"""LightningDataModules and dataset builders."""
