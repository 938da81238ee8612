"""The reconstruction pipeline: plain stages over arrays and small dataclasses.

decode ► detect ► landmarks ► pose ► mesh+UV ► texture ► splats ► package
"""
