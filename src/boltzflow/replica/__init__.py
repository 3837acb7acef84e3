"""boltzflow.replica"""
