"""boltzflow.transforms"""
