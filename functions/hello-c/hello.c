/* hello-c: a WAGI function in C. Greets the caller and echoes method, path and query. */
#include <stdio.h>
#include <stdlib.h>

static const char *env_or(const char *name, const char *fallback) {
    const char *v = getenv(name);
    return v ? v : fallback;
}

int main(void) {
    size_t body = 0;
    int c;
    while ((c = getchar()) != EOF) body++;

    printf("Content-Type: text/plain\n");
    printf("X-Wafer-Example: hello-c\n");
    printf("\n");
    printf("Hello from C!\n");
    printf("method: %s\n", env_or("REQUEST_METHOD", "GET"));
    printf("path: %s\n", env_or("PATH_INFO", "/"));
    printf("query: %s\n", env_or("QUERY_STRING", ""));
    printf("body: %zu bytes\n", body);
    return 0;
}
