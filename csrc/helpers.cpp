// Sequential index loops of the phi1 data pipeline, as a pybind11 extension (phi1.data._helpers).
//
// Both routines are single passes that NumPy cannot vectorise without O(n) temporaries; each has a NumPy
// reference in phi1/data/helpers.py that the tests compare against. All counts and offsets are int64, so
// corpora past 2^31 tokens or samples do not overflow, and the GIL is released while the loops run.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

// Row i of the result is the position (index into document_index, token offset in that document) of token
// i * seq_len of the packed stream documents[document_index[0]], documents[document_index[1]], ...
// Sample i covers the tokens from row i to row i + 1 inclusive when add_extra_token is 1 (seq_len + 1 tokens,
// the last one shared with the next sample), exclusive when 0.
py::array_t<int64_t> build_sample_index(py::array_t<int32_t, py::array::c_style | py::array::forcecast> sizes,
                                        py::array_t<int64_t, py::array::c_style | py::array::forcecast> document_index,
                                        int64_t seq_len, int64_t num_samples, int64_t add_extra_token) {
    if (seq_len <= 0) throw std::invalid_argument("seq_len must be positive, got " + std::to_string(seq_len));
    if (num_samples < 0) throw std::invalid_argument("num_samples must be >= 0");
    if (add_extra_token != 0 && add_extra_token != 1) throw std::invalid_argument("add_extra_token must be 0 or 1");
    const int32_t* size_data = sizes.data();
    const int64_t* document_data = document_index.data();
    const int64_t num_sizes = sizes.shape(0);
    const int64_t num_positions = document_index.shape(0);
    for (int64_t i = 0; i < num_positions; ++i) {
        if (document_data[i] < 0 || document_data[i] >= num_sizes)
            throw std::out_of_range("document_index[" + std::to_string(i) + "] = " + std::to_string(document_data[i]) +
                                    " is not a document (there are " + std::to_string(num_sizes) + ")");
    }

    py::array_t<int64_t> result({num_samples + 1, int64_t{2}});
    int64_t* out = result.mutable_data();
    bool too_short = false;
    {
        py::gil_scoped_release release;
        int64_t position = 0;      // index into document_index
        int64_t document_start = 0;  // stream offset of the first token of document_index[position]
        int64_t document_end = num_positions ? size_data[document_data[0]] : 0;
        for (int64_t sample = 0; sample <= num_samples; ++sample) {
            const int64_t target = sample * seq_len;
            // Move to the first document that still holds token `target` (skipping empty documents).
            while (document_end <= target && position + 1 < num_positions) {
                ++position;
                document_start = document_end;
                document_end += size_data[document_data[position]];
            }
            // Every row names a real token, except the end row of exclusive samples, which may be one past it.
            const bool exclusive_end = sample == num_samples && add_extra_token == 0;
            if (exclusive_end ? document_end < target : document_end <= target) {
                too_short = true;
                break;
            }
            out[2 * sample] = position;
            out[2 * sample + 1] = target - document_start;
        }
    }
    if (too_short)
        throw std::invalid_argument("the documents hold fewer tokens than num_samples * seq_len + add_extra_token");
    return result;
}

// Greedy exact blending: sample i goes to the dataset with the largest deficit weights[d] * (i + 1) - count[d]
// (lowest index on ties), so after n samples every dataset has had floor or ceil of weights[d] * n of them.
py::tuple build_blending_indices(py::array_t<double, py::array::c_style | py::array::forcecast> weights,
                                 int64_t size) {
    const int64_t num_datasets = weights.shape(0);
    if (num_datasets < 1 || num_datasets > std::numeric_limits<int16_t>::max())
        throw std::invalid_argument("need 1 to 32767 datasets, got " + std::to_string(num_datasets));
    if (size < 0) throw std::invalid_argument("size must be >= 0");
    const double* weight_data = weights.data();
    py::array_t<int16_t> dataset_index(size);
    py::array_t<int64_t> dataset_sample_index(size);
    int16_t* dataset_out = dataset_index.mutable_data();
    int64_t* sample_out = dataset_sample_index.mutable_data();
    {
        py::gil_scoped_release release;
        std::vector<int64_t> counts(num_datasets, 0);
        for (int64_t i = 0; i < size; ++i) {
            const double drawn = static_cast<double>(i + 1);
            int64_t best = 0;
            double best_deficit = weight_data[0] * drawn - static_cast<double>(counts[0]);
            for (int64_t d = 1; d < num_datasets; ++d) {
                const double deficit = weight_data[d] * drawn - static_cast<double>(counts[d]);
                if (deficit > best_deficit) {
                    best_deficit = deficit;
                    best = d;
                }
            }
            dataset_out[i] = static_cast<int16_t>(best);
            sample_out[i] = counts[best]++;
        }
    }
    return py::make_tuple(dataset_index, dataset_sample_index);
}

}  // namespace

PYBIND11_MODULE(_helpers, m) {
    m.doc() = "Sequential index builders of phi1.data (see phi1/data/helpers.py for the NumPy references).";
    m.def("build_sample_index", &build_sample_index, py::arg("sizes"), py::arg("document_index"), py::arg("seq_len"),
          py::arg("num_samples"), py::arg("add_extra_token") = 1,
          "(num_samples + 1, 2) int64: document-index position and token offset where each sample starts.");
    m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"),
          "(dataset_index int16 (size,), dataset_sample_index int64 (size,)) by greedy exact proportions.");
}
