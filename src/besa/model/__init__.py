"""The model side: loading from anywhere (`loading`), blocks and linears found generically (`blocks`), Mixture-of-Experts
experts as linears (`experts`), and calibration / evaluation text (`data`)."""
