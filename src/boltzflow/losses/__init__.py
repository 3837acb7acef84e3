"""boltzflow.losses"""
