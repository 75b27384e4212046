from llmproxy.cli import main

main()
