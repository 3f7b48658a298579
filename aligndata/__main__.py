from aligndata.cli import main

main()
