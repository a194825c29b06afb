def main():
    pass

def partition_main():
    pass
