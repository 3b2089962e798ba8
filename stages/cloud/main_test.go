package cloud

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"imcloud/proto/client"
)

// clientsEnv makes the test binary a client process: "target n"
// opens n authenticated idle connections, prints "ready", and holds them
// until stdin closes. Benchmarks that measure the server's memory run their
// clients this way, so that client memory is not counted.
const clientsEnv = "IMCLOUD_CLOUD_TEST_CLIENTS"

func TestMain(m *testing.M) {
	if spec := os.Getenv(clientsEnv); spec != "" {
		if err := holdClients(spec); err != nil {
			fmt.Fprintln(os.Stderr, "clients:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func holdClients(spec string) error {
	var (
		addr string
		n    int
	)
	if _, err := fmt.Sscan(spec, &addr, &n); err != nil {
		return fmt.Errorf("spec %q: %w", spec, err)
	}
	conns := make([]*client.Conn, n)
	errs := make(chan error, n)
	sem := make(chan struct{}, 64)
	var wg sync.WaitGroup
	for i := range n {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			c, err := client.Dial(ctx, addr, client.Options{})
			if err == nil {
				_, err = c.Auth([]byte(`{"mid":` + strconv.Itoa(i+1) + `}`))
			}
			if err != nil {
				errs <- err
				return
			}
			conns[i] = c
		})
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return err
	}
	fmt.Println("ready")
	_, _ = bufio.NewReader(os.Stdin).ReadString('\n')
	for _, c := range conns {
		_ = c.Close()
	}
	return nil
}
