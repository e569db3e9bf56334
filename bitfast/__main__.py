"""python -m bitfast: print what this install can do."""
from bitfast.info import info

if __name__ == "__main__":
    info()
